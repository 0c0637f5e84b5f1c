package dev.freshet.connect;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.math.BigDecimal;
import java.nio.ByteBuffer;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.kafka.connect.data.Date;
import org.apache.kafka.connect.data.Decimal;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.data.SchemaBuilder;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.data.Time;
import org.apache.kafka.connect.data.Timestamp;
import org.apache.kafka.connect.json.JsonConverter;
import org.junit.Test;

/** The cheap bound is never below what JsonConverter really writes. */
public class JsonSizeBoundTest {
    // The worker's converter, and the settings a deployment may change.
    private static final List<JsonConverter> CONVERTERS = List.of(
            Envelopes.converter(),
            Envelopes.converter(Map.of("decimal.format", "NUMERIC")),
            Envelopes.converter(Map.of("replace.null.with.default", "false")));

    /** Asserts the bound holds under every converter; returns the default converter's size. */
    private static long assertBound(Schema schema, Object value) {
        long bound = JsonSizeBound.of(schema, value);
        long first = -1;
        for (JsonConverter converter : CONVERTERS) {
            long exact = converter.fromConnectData("t", schema, value).length;
            assertTrue("bound " + bound + " < exact " + exact + " for " + value, bound >= exact);
            first = first < 0 ? exact : first;
        }
        return first;
    }

    @Test
    public void controlCharactersEscapeSixFoldAndTheBoundIsTight() {
        String text = "\u0001".repeat(1_000);
        long exact = assertBound(Schema.STRING_SCHEMA, text);
        assertEquals(2 + 6 * 1_000, exact);
        assertEquals(exact, JsonSizeBound.of(Schema.STRING_SCHEMA, text));
    }

    @Test
    public void nonBmpAndOtherCharacters() {
        assertBound(Schema.STRING_SCHEMA, "\uD83D\uDE00".repeat(500)); // U+1F600, a surrogate pair
        assertBound(Schema.STRING_SCHEMA, "\uD83D".repeat(100)); // unpaired high surrogates
        assertBound(Schema.STRING_SCHEMA, "\uDE00x".repeat(100)); // unpaired low surrogates
        assertBound(Schema.STRING_SCHEMA, "\u20AC\u00E9\u4E2D".repeat(300)); // 2- and 3-byte UTF-8
        assertBound(Schema.STRING_SCHEMA, "\"\\/\n\r\t\b\f\u007F\u2028".repeat(300));
        assertBound(Schema.STRING_SCHEMA, "");
    }

    @Test
    public void byteArraysAreBase64() {
        for (int n = 0; n <= 10; n++) {
            byte[] bytes = new byte[n];
            Arrays.fill(bytes, (byte) 0xFF);
            long exact = assertBound(Schema.BYTES_SCHEMA, bytes);
            assertEquals(exact, JsonSizeBound.of(Schema.BYTES_SCHEMA, bytes));
        }
        assertBound(Schema.BYTES_SCHEMA, ByteBuffer.wrap(new byte[30], 5, 3));
        assertBound(null, new byte[1_000]);
    }

    @Test
    public void extremeNumbers() {
        for (Object number : List.of(Byte.MIN_VALUE, Short.MIN_VALUE, Integer.MIN_VALUE, Long.MIN_VALUE,
                -Float.MAX_VALUE, -Float.MIN_VALUE, -Float.MIN_NORMAL, Float.NaN, Float.NEGATIVE_INFINITY,
                -Double.MAX_VALUE, -Double.MIN_VALUE, -Double.MIN_NORMAL, Double.NaN, Double.NEGATIVE_INFINITY,
                -1.0 / 3, true, false)) {
            assertBound(null, number);
        }
    }

    @Test
    public void logicalTypesAndDefaults() {
        Schema decimal = Decimal.schema(4);
        Schema schema = SchemaBuilder.struct()
                .field("price", decimal)
                .field("big", Decimal.schema(0))
                .field("day", Date.SCHEMA)
                .field("at", Time.SCHEMA)
                .field("stamp", Timestamp.SCHEMA)
                .field("fallback", SchemaBuilder.string().optional().defaultValue("\u0001".repeat(50)).build())
                .field("missing", Schema.OPTIONAL_INT64_SCHEMA)
                .build();
        Struct value = new Struct(schema)
                .put("price", new BigDecimal("-12345678901234567890.1234"))
                .put("big", new BigDecimal("-1").movePointRight(300))
                .put("day", new java.util.Date(86_400_000L * 20_000))
                .put("at", new java.util.Date(86_399_999L))
                .put("stamp", new java.util.Date(Long.MIN_VALUE))
                .put("fallback", null)
                .put("missing", null);
        assertBound(schema, value);
    }

    @Test
    public void nestedCollectionsAndMaps() {
        Map<Object, Object> nonStringKeys = new LinkedHashMap<>();
        nonStringKeys.put(1L, List.of("a", "\u0002"));
        nonStringKeys.put(Long.MIN_VALUE, Map.of("k", new byte[5]));
        Map<String, Object> value = new LinkedHashMap<>();
        value.put("\u0003key\"", nonStringKeys);
        value.put("list", Arrays.asList(null, 1, 2.5, "x", List.of(), Map.of()));
        value.put("empty", Map.of());
        assertBound(null, value);

        Schema typed = SchemaBuilder.map(Schema.INT32_SCHEMA, SchemaBuilder.array(Schema.OPTIONAL_STRING_SCHEMA));
        assertBound(typed, Map.of(Integer.MIN_VALUE, Arrays.asList("\u0004", null), 3, List.of()));
    }

    @Test
    public void debeziumEnvelope() {
        assertBound(Envelopes.ENVELOPE, Envelopes.update(7, "body with \u0001 and \uD83D\uDE00"));
    }

    @Test
    public void stopsEarlyAboveTheLimit() {
        List<String> items = List.of("a".repeat(100), "b".repeat(100), "c".repeat(100));
        long full = JsonSizeBound.of(null, items);
        long early = JsonSizeBound.of(null, items, 10);
        assertTrue(early > 10);
        assertTrue(early < full);
    }

    @Test
    public void unknownTypesBoundToTheMaximum() {
        assertEquals(Long.MAX_VALUE, JsonSizeBound.of(null, List.of(new Object(), "x")));
    }
}
