package dev.freshet.connect;

import java.math.BigDecimal;
import java.nio.ByteBuffer;
import java.util.Collection;
import java.util.Date;
import java.util.Map;

import org.apache.kafka.connect.data.Field;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.data.Struct;

/**
 * An upper bound of the bytes JsonConverter (schemas.enable=false) writes for a Connect value,
 * found without serializing it, so that small records cost a walk over their fields only.
 *
 * <p>Each term is a worst case of Jackson's output: a string's UTF-16 unit takes at most 6 bytes
 * (a control character or an unpaired half of a surrogate pair is written as a six-byte
 * {@code \}{@code uXXXX} escape), byte arrays are base64 in quotes, numbers take their longest
 * decimal form. A null field counts its schema's default too, which the converter may write in
 * its place. A value of a type the walk does not know bounds to {@link Long#MAX_VALUE}: only the
 * converter can size it.
 */
final class JsonSizeBound {
    private static final long NULL = 4; // null
    private static final long BOOLEAN = 5; // false
    private static final long INT8 = 4; // -128
    private static final long INT16 = 6; // -32768
    private static final long INT32 = 11; // -2147483648
    private static final long INT64 = 20; // -9223372036854775808
    // A double's shortest form is at most 24 characters (-2.2250738585072014E-308); NaN and
    // the infinities are written quoted ("-Infinity").
    private static final long FLOATING = 32;

    private JsonSizeBound() {
    }

    /** The bound for {@code value} under {@code schema} (null for a schemaless value). */
    static long of(Schema schema, Object value) {
        return of(schema, value, Long.MAX_VALUE);
    }

    /**
     * The bound, or, as soon as the walk has counted past {@code stopAbove}, some number above
     * it: a value far over the limit is not walked to its end.
     */
    static long of(Schema schema, Object value, long stopAbove) {
        Walk walk = new Walk(stopAbove);
        walk.value(schema, value);
        return walk.total;
    }

    static long string(long utf16Units) {
        return 2 + 6 * utf16Units;
    }

    static long base64(long bytes) {
        return 2 + 4 * ((bytes + 2) / 3);
    }

    private static final class Walk {
        private final long stopAbove;
        private long total;

        Walk(long stopAbove) {
            this.stopAbove = stopAbove;
        }

        private boolean done() {
            return total > stopAbove;
        }

        private void add(long bytes) {
            total = bytes > Long.MAX_VALUE - total ? Long.MAX_VALUE : total + bytes;
        }

        void value(Schema schema, Object value) {
            if (done()) {
                return;
            }
            if (value == null) {
                add(NULL);
                // replace.null.with.default (on by default) writes the default instead
                if (schema != null && schema.defaultValue() != null) {
                    value(schema, schema.defaultValue());
                }
            } else if (value instanceof CharSequence text) {
                add(string(text.length()));
            } else if (value instanceof byte[] bytes) {
                add(base64(bytes.length));
            } else if (value instanceof ByteBuffer buffer) {
                // the converter encodes the whole backing array, not only the remaining bytes
                add(base64(buffer.hasArray() ? buffer.array().length : buffer.capacity()));
            } else if (value instanceof Boolean) {
                add(BOOLEAN);
            } else if (value instanceof Byte) {
                add(INT8);
            } else if (value instanceof Short) {
                add(INT16);
            } else if (value instanceof Integer) {
                add(INT32);
            } else if (value instanceof Long || value instanceof Date) {
                // Connect's Date, Time and Timestamp are written as int32 or int64 numbers
                add(INT64);
            } else if (value instanceof Float || value instanceof Double) {
                add(FLOATING);
            } else if (value instanceof BigDecimal decimal) {
                // Decimal: base64 of the unscaled value (decimal.format=BASE64), or the number
                long numeric = decimal.toString().length();
                long encoded = base64(decimal.unscaledValue().bitLength() / 8 + 1);
                add(Math.max(numeric, encoded));
            } else if (value instanceof Struct struct) {
                struct(struct);
            } else if (value instanceof Map<?, ?> map) {
                map(schema, map);
            } else if (value instanceof Collection<?> items) {
                array(schema, items);
            } else {
                add(Long.MAX_VALUE);
            }
        }

        private void struct(Struct struct) {
            add(2); // {}
            for (Field field : struct.schema().fields()) {
                if (done()) {
                    return;
                }
                add(string(field.name().length()) + 2); // "name": and a comma
                value(field.schema(), struct.getWithoutDefault(field.name()));
            }
        }

        private void map(Schema schema, Map<?, ?> map) {
            boolean typed = schema != null && schema.type() == Schema.Type.MAP;
            Schema keySchema = typed ? schema.keySchema() : null;
            Schema valueSchema = typed ? schema.valueSchema() : null;
            add(2);
            for (Map.Entry<?, ?> entry : map.entrySet()) {
                if (done()) {
                    return;
                }
                // the larger of {"key":value,} and, for non-string keys, [[key,value],]
                add(4);
                value(keySchema, entry.getKey());
                value(valueSchema, entry.getValue());
            }
        }

        private void array(Schema schema, Collection<?> items) {
            boolean typed = schema != null && schema.type() == Schema.Type.ARRAY;
            Schema itemSchema = typed ? schema.valueSchema() : null;
            add(2);
            for (Object item : items) {
                if (done()) {
                    return;
                }
                add(1); // comma
                value(itemSchema, item);
            }
        }
    }
}
