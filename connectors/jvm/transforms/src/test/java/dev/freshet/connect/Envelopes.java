package dev.freshet.connect;

import java.util.HashMap;
import java.util.Map;

import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.data.SchemaBuilder;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.json.JsonConverter;
import org.apache.kafka.connect.json.JsonConverterConfig;
import org.apache.kafka.connect.source.SourceRecord;

/** Debezium-shaped PostgreSQL change events for app.articles, and the worker's value converter. */
final class Envelopes {
    static final String TOPIC = "freshet.app.articles";

    static final Schema KEY = SchemaBuilder.struct()
            .name("freshet.app.articles.Key")
            .field("id", Schema.INT32_SCHEMA)
            .build();

    static final Schema ROW = SchemaBuilder.struct()
            .name("freshet.app.articles.Value")
            .optional()
            .field("id", Schema.INT32_SCHEMA)
            .field("title", Schema.STRING_SCHEMA)
            .field("body", Schema.OPTIONAL_STRING_SCHEMA)
            .build();

    static final Schema SOURCE = SchemaBuilder.struct()
            .name("io.debezium.connector.postgresql.Source")
            .field("version", Schema.STRING_SCHEMA)
            .field("connector", Schema.STRING_SCHEMA)
            .field("name", Schema.STRING_SCHEMA)
            .field("ts_ms", Schema.INT64_SCHEMA)
            .field("snapshot", SchemaBuilder.string().optional().defaultValue("false").build())
            .field("db", Schema.STRING_SCHEMA)
            .field("sequence", Schema.OPTIONAL_STRING_SCHEMA)
            .field("ts_us", Schema.OPTIONAL_INT64_SCHEMA)
            .field("ts_ns", Schema.OPTIONAL_INT64_SCHEMA)
            .field("schema", Schema.STRING_SCHEMA)
            .field("table", Schema.STRING_SCHEMA)
            .field("txId", Schema.OPTIONAL_INT64_SCHEMA)
            .field("lsn", Schema.OPTIONAL_INT64_SCHEMA)
            .field("xmin", Schema.OPTIONAL_INT64_SCHEMA)
            .build();

    static final Schema ENVELOPE = SchemaBuilder.struct()
            .name("freshet.app.articles.Envelope")
            .version(2)
            .field("before", ROW)
            .field("after", ROW)
            .field("source", SOURCE)
            .field("transaction", SchemaBuilder.struct()
                    .name("event.block")
                    .optional()
                    .field("id", Schema.STRING_SCHEMA)
                    .field("total_order", Schema.INT64_SCHEMA)
                    .field("data_collection_order", Schema.INT64_SCHEMA)
                    .build())
            .field("op", Schema.STRING_SCHEMA)
            .field("ts_ms", Schema.OPTIONAL_INT64_SCHEMA)
            .field("ts_us", Schema.OPTIONAL_INT64_SCHEMA)
            .field("ts_ns", Schema.OPTIONAL_INT64_SCHEMA)
            .build();

    private Envelopes() {
    }

    static Struct source() {
        return new Struct(SOURCE)
                .put("version", "3.6.1.Final")
                .put("connector", "postgresql")
                .put("name", "freshet")
                .put("ts_ms", 1_767_000_000_000L)
                .put("db", "freshet")
                .put("sequence", "[\"24023128\",\"24023184\"]")
                .put("ts_us", 1_767_000_000_000_123L)
                .put("ts_ns", 1_767_000_000_000_123_000L)
                .put("schema", "app")
                .put("table", "articles")
                .put("txId", 771L)
                .put("lsn", 24_023_184L)
                .put("xmin", null);
    }

    /** An update of article {@code id} whose body is {@code body}. */
    static Struct update(int id, String body) {
        Struct before = new Struct(ROW).put("id", id).put("title", "old title").put("body", "old");
        Struct after = new Struct(ROW).put("id", id).put("title", "Rivers in spring").put("body", body);
        return new Struct(ENVELOPE)
                .put("before", before)
                .put("after", after)
                .put("source", source())
                .put("op", "u")
                .put("ts_ms", 1_767_000_000_100L)
                .put("ts_us", 1_767_000_000_100_456L)
                .put("ts_ns", 1_767_000_000_100_456_000L);
    }

    static SourceRecord record(int id, Struct value) {
        SourceRecord record = new SourceRecord(
                Map.of("server", "freshet"), Map.of("lsn", 24_023_184L, "txId", 771L),
                TOPIC, 2, KEY, new Struct(KEY).put("id", id), value == null ? null : ENVELOPE, value,
                1_767_000_000_200L);
        record.headers().addString("trace", "t-1");
        return record;
    }

    /** The worker's value converter: JsonConverter with schemas.enable=false. */
    static JsonConverter converter(Map<String, String> extra) {
        JsonConverter converter = new JsonConverter();
        Map<String, Object> config = new HashMap<>(extra);
        config.put(JsonConverterConfig.SCHEMAS_ENABLE_CONFIG, "false");
        converter.configure(config, false);
        return converter;
    }

    static JsonConverter converter() {
        return converter(Map.of());
    }

    static long jsonBytes(Schema schema, Object value) {
        return converter().fromConnectData(TOPIC, schema, value).length;
    }
}
