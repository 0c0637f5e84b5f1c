package dev.freshet.connect;

import java.util.Map;
import java.util.function.LongSupplier;

import org.apache.kafka.common.config.AbstractConfig;
import org.apache.kafka.common.config.ConfigDef;
import org.apache.kafka.connect.connector.ConnectRecord;
import org.apache.kafka.connect.data.Field;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.data.SchemaBuilder;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.header.Headers;
import org.apache.kafka.connect.json.JsonConverter;
import org.apache.kafka.connect.json.JsonConverterConfig;
import org.apache.kafka.connect.transforms.Transformation;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Replaces a record whose value would serialize to more than {@code max.bytes} of JSON with a
 * small marker, so that one huge row reaches Kafka as a dead letter instead of failing the task
 * with RecordTooLargeException and stopping every table.
 *
 * <p>The size is the one JsonConverter with schemas.enable=false (the worker's value converter)
 * writes. A cheap upper bound ({@link JsonSizeBound}) lets almost every record through without
 * serializing it; only a record whose bound is over the limit is serialized once to be measured.
 *
 * <p>The marker keeps the topic, partition, key, timestamp and headers (plus {@value #HEADER}:
 * the byte count), and its value is a {@value #MARKER_SCHEMA_NAME} struct:
 * {@code {"op":"oversized","source":{...},"ts_ms":...,"oversized":{"bytes":...,"limit":...,"op":"u"}}},
 * where source and the inner op are the Debezium envelope's, when the value has them.
 */
public class OversizedGuard<R extends ConnectRecord<R>> implements Transformation<R> {
    public static final String MAX_BYTES_CONFIG = "max.bytes";
    public static final String HEADER = "freshet.oversized";
    public static final String MARKER_SCHEMA_NAME = "dev.freshet.Oversized";
    public static final String MARKER_OP = "oversized";

    public static final ConfigDef CONFIG_DEF = new ConfigDef().define(
            MAX_BYTES_CONFIG,
            ConfigDef.Type.LONG,
            ConfigDef.NO_DEFAULT_VALUE,
            ConfigDef.Range.atLeast(1),
            ConfigDef.Importance.HIGH,
            "The largest value, in bytes of JSON as JsonConverter (schemas.enable=false) writes it, "
                    + "that passes unchanged; a larger one is replaced by a dev.freshet.Oversized marker. "
                    + "Keep it below the producer's max.request.size and the topic's max.message.bytes, "
                    + "less room for the key, the headers and the batch overhead.");

    static final Schema DETAIL_SCHEMA = SchemaBuilder.struct()
            .name(MARKER_SCHEMA_NAME + ".Detail")
            .field("bytes", Schema.INT64_SCHEMA)
            .field("limit", Schema.INT64_SCHEMA)
            .field("op", Schema.OPTIONAL_STRING_SCHEMA)
            .build();

    // The source field's schema when the value has no Debezium source: always null.
    private static final Schema NO_SOURCE_SCHEMA = SchemaBuilder.struct()
            .name(MARKER_SCHEMA_NAME + ".NoSource")
            .optional()
            .build();

    private static final Logger log = LoggerFactory.getLogger(OversizedGuard.class);
    private static final int KEY_LOG_CHARS = 200;

    private final LongSupplier clock;
    private long maxBytes;
    private JsonConverter converter;
    // Debezium gives every event of a connector the same source schema: build the marker's once.
    private Schema markerSourceSchema;
    private Schema markerSchema;

    public OversizedGuard() {
        this(System::currentTimeMillis);
    }

    /** With the clock that stamps a marker's ts_ms (for tests). */
    OversizedGuard(LongSupplier clock) {
        this.clock = clock;
    }

    @Override
    public void configure(Map<String, ?> configs) {
        maxBytes = new AbstractConfig(CONFIG_DEF, configs).getLong(MAX_BYTES_CONFIG);
        converter = new JsonConverter();
        converter.configure(Map.of(JsonConverterConfig.SCHEMAS_ENABLE_CONFIG, "false"), false);
    }

    @Override
    public R apply(R record) {
        Object value = record.value();
        if (value == null) {
            return record;
        }
        if (JsonSizeBound.of(record.valueSchema(), value, maxBytes) <= maxBytes) {
            return record;
        }
        long bytes = serializedSize(record);
        if (bytes <= maxBytes) {
            return record;
        }
        return marker(record, bytes);
    }

    /** The exact byte count of the record's value as the worker's JsonConverter writes it. */
    long serializedSize(R record) {
        byte[] json = converter.fromConnectData(record.topic(), record.valueSchema(), record.value());
        return json == null ? 0 : json.length;
    }

    private R marker(R record, long bytes) {
        Struct envelope = record.value() instanceof Struct struct ? struct : null;
        Struct source = envelope == null ? null : structField(envelope, "source");
        String op = originalOp(record.value());

        Schema schema = markerSchema(source == null ? null : source.schema());
        Struct detail = new Struct(DETAIL_SCHEMA)
                .put("bytes", bytes)
                .put("limit", maxBytes)
                .put("op", op);
        Struct marker = new Struct(schema)
                .put("op", MARKER_OP)
                .put("source", source)
                .put("ts_ms", clock.getAsLong())
                .put("oversized", detail);

        Headers headers = record.headers().duplicate();
        headers.remove(HEADER);
        headers.addString(HEADER, Long.toString(bytes));

        log.warn("oversized record replaced by a marker: topic={} table={} key={} bytes={} max.bytes={}",
                record.topic(), table(source), truncated(record.key()), bytes, maxBytes);
        return record.newRecord(record.topic(), record.kafkaPartition(), record.keySchema(), record.key(),
                schema, marker, record.timestamp(), headers);
    }

    private Schema markerSchema(Schema sourceSchema) {
        if (markerSchema == null || sourceSchema != markerSourceSchema) {
            markerSchema = SchemaBuilder.struct()
                    .name(MARKER_SCHEMA_NAME)
                    .field("op", Schema.STRING_SCHEMA)
                    .field("source", sourceSchema == null ? NO_SOURCE_SCHEMA : sourceSchema)
                    .field("ts_ms", Schema.INT64_SCHEMA)
                    .field("oversized", DETAIL_SCHEMA)
                    .build();
            markerSourceSchema = sourceSchema;
        }
        return markerSchema;
    }

    /** The envelope's op ("c", "u", "d", "r"), from a Debezium struct or a schemaless map. */
    private static String originalOp(Object value) {
        Object op;
        if (value instanceof Struct struct) {
            Field field = struct.schema().field("op");
            op = field == null ? null : struct.getWithoutDefault("op");
        } else if (value instanceof Map<?, ?> map) {
            op = map.get("op");
        } else {
            op = null;
        }
        return op instanceof String text ? text : null;
    }

    private static Struct structField(Struct struct, String name) {
        Field field = struct.schema().field(name);
        if (field == null || field.schema().type() != Schema.Type.STRUCT) {
            return null;
        }
        return (Struct) struct.getWithoutDefault(name);
    }

    /** "schema.table" from a Debezium source block, for the log line. */
    private static String table(Struct source) {
        if (source == null) {
            return "-";
        }
        Object schema = source.schema().field("schema") == null ? null : source.getWithoutDefault("schema");
        Object table = source.schema().field("table") == null ? null : source.getWithoutDefault("table");
        if (table == null) {
            return "-";
        }
        return schema == null ? table.toString() : schema + "." + table;
    }

    private static String truncated(Object key) {
        String text = String.valueOf(key);
        return text.length() <= KEY_LOG_CHARS ? text : text.substring(0, KEY_LOG_CHARS) + "...";
    }

    @Override
    public ConfigDef config() {
        return CONFIG_DEF;
    }

    @Override
    public String version() {
        String version = OversizedGuard.class.getPackage().getImplementationVersion();
        return version == null ? "unknown" : version;
    }

    @Override
    public void close() {
        if (converter != null) {
            converter.close();
        }
    }
}
