package dev.freshet.connect;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertSame;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.kafka.common.config.ConfigException;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.header.Header;
import org.apache.kafka.connect.source.SourceRecord;
import org.junit.After;
import org.junit.Test;

public class OversizedGuardTest {
    private static final long NOW = 1_767_000_000_999L;

    private final List<OversizedGuard<SourceRecord>> guards = new ArrayList<>();

    private OversizedGuard<SourceRecord> guard(long maxBytes) {
        OversizedGuard<SourceRecord> guard = new OversizedGuard<>(() -> NOW);
        guard.configure(Map.of(OversizedGuard.MAX_BYTES_CONFIG, Long.toString(maxBytes)));
        guards.add(guard);
        return guard;
    }

    @After
    public void closeGuards() {
        guards.forEach(OversizedGuard::close);
    }

    @Test
    public void smallEnvelopePassesAsTheSameObject() {
        SourceRecord record = Envelopes.record(7, Envelopes.update(7, "a short body"));
        assertSame(record, guard(16L << 20).apply(record));
    }

    @Test
    public void tombstonePasses() {
        SourceRecord tombstone = Envelopes.record(7, null);
        assertSame(tombstone, guard(1).apply(tombstone));
    }

    @Test
    public void oversizedEnvelopeBecomesTheMarker() {
        Struct value = Envelopes.update(7, "x".repeat(5_000));
        SourceRecord record = Envelopes.record(7, value);
        long exact = Envelopes.jsonBytes(Envelopes.ENVELOPE, value);

        SourceRecord out = guard(1_000).apply(record);

        assertEquals(record.topic(), out.topic());
        assertEquals(record.kafkaPartition(), out.kafkaPartition());
        assertSame(record.keySchema(), out.keySchema());
        assertSame(record.key(), out.key());
        assertEquals(record.timestamp(), out.timestamp());
        // offsets still commit: the marker stands for the original event
        assertEquals(record.sourcePartition(), out.sourcePartition());
        assertEquals(record.sourceOffset(), out.sourceOffset());

        assertEquals(OversizedGuard.MARKER_SCHEMA_NAME, out.valueSchema().name());
        Struct marker = (Struct) out.value();
        assertEquals("oversized", marker.getString("op"));
        assertSame(value.getStruct("source"), marker.getStruct("source"));
        assertEquals(Long.valueOf(NOW), marker.getInt64("ts_ms"));
        Struct detail = marker.getStruct("oversized");
        assertEquals(Long.valueOf(exact), detail.getInt64("bytes"));
        assertEquals(Long.valueOf(1_000), detail.getInt64("limit"));
        assertEquals("u", detail.getString("op"));

        assertEquals("t-1", out.headers().lastWithName("trace").value());
        assertEquals(Long.toString(exact), out.headers().lastWithName(OversizedGuard.HEADER).value());
        assertEquals(1, count(out.headers().allWithName(OversizedGuard.HEADER)));
        // the original record keeps its own headers
        assertNull(record.headers().lastWithName(OversizedGuard.HEADER));
    }

    @Test
    public void exactlyAtTheLimitPasses() {
        // Escapable text makes the bound overshoot, so the exact count decides.
        Struct value = Envelopes.update(7, "line\n\"quoted\"\t".repeat(300));
        SourceRecord record = Envelopes.record(7, value);
        long exact = Envelopes.jsonBytes(Envelopes.ENVELOPE, value);
        assertTrue(JsonSizeBound.of(Envelopes.ENVELOPE, value) > exact);

        assertSame(record, guard(exact).apply(record));
        SourceRecord over = guard(exact - 1).apply(record);
        Struct detail = ((Struct) over.value()).getStruct("oversized");
        assertEquals(Long.valueOf(exact), detail.getInt64("bytes"));
        assertEquals(Long.valueOf(exact - 1), detail.getInt64("limit"));
    }

    @Test
    public void schemalessMapValue() {
        Map<String, Object> value = new LinkedHashMap<>();
        value.put("op", "c");
        value.put("after", Map.of("id", 7, "body", "y".repeat(3_000)));
        SourceRecord record = new SourceRecord(null, null, Envelopes.TOPIC, null, null, "7", null, value);
        long exact = Envelopes.jsonBytes(null, value);

        assertSame(record, guard(exact).apply(record));
        SourceRecord out = guard(exact - 1).apply(record);
        Struct marker = (Struct) out.value();
        assertEquals("oversized", marker.getString("op"));
        assertNull(marker.get("source"));
        assertEquals(Long.valueOf(exact), marker.getStruct("oversized").getInt64("bytes"));
        assertEquals("c", marker.getStruct("oversized").getString("op"));
        assertEquals("7", out.key());
    }

    @Test
    public void markerSerializesToTheDocumentedJson() throws Exception {
        Struct value = Envelopes.update(7, "z".repeat(10_000));
        SourceRecord out = guard(2_000).apply(Envelopes.record(7, value));

        byte[] json = Envelopes.converter().fromConnectData(out.topic(), out.valueSchema(), out.value());
        JsonNode marker = new ObjectMapper().readTree(json);

        List<String> fields = new ArrayList<>();
        marker.fieldNames().forEachRemaining(fields::add);
        assertEquals(List.of("op", "source", "ts_ms", "oversized"), fields);
        assertEquals("oversized", marker.get("op").asText());
        assertEquals(NOW, marker.get("ts_ms").asLong());
        JsonNode source = marker.get("source");
        assertEquals("app", source.get("schema").asText());
        assertEquals("articles", source.get("table").asText());
        assertEquals(24_023_184L, source.get("lsn").asLong());
        assertEquals(1_767_000_000_000L, source.get("ts_ms").asLong());
        assertEquals(1_767_000_000_000_123L, source.get("ts_us").asLong());
        JsonNode detail = marker.get("oversized");
        assertEquals(Envelopes.jsonBytes(Envelopes.ENVELOPE, value), detail.get("bytes").asLong());
        assertEquals(2_000, detail.get("limit").asLong());
        assertEquals("u", detail.get("op").asText());
        assertTrue("marker is small: " + new String(json, StandardCharsets.UTF_8), json.length < 600);
    }

    @Test
    public void markerWithoutSourceSerializesSourceAsNull() throws Exception {
        Map<String, Object> value = Map.of("body", "w".repeat(1_000));
        SourceRecord out = guard(100).apply(new SourceRecord(null, null, "t", null, null, null, null, value));
        byte[] json = Envelopes.converter().fromConnectData(out.topic(), out.valueSchema(), out.value());
        JsonNode marker = new ObjectMapper().readTree(json);
        assertTrue(marker.get("source").isNull());
        assertTrue(marker.get("oversized").get("op").isNull());
    }

    @Test
    public void maxBytesIsRequiredAndPositive() {
        OversizedGuard<SourceRecord> guard = new OversizedGuard<>();
        assertThrows(ConfigException.class, () -> guard.configure(Map.of()));
        assertThrows(ConfigException.class, () -> guard.configure(Map.of(OversizedGuard.MAX_BYTES_CONFIG, "0")));
        assertThrows(ConfigException.class, () -> guard.configure(Map.of(OversizedGuard.MAX_BYTES_CONFIG, "16MiB")));
    }

    private static int count(Iterator<Header> headers) {
        int n = 0;
        while (headers.hasNext()) {
            headers.next();
            n++;
        }
        return n;
    }
}
