/*
 * Compatibility shim for Debezium 3.6.1 on Kafka 4.4.
 *
 * Kafka 4.4 moved org.apache.kafka.common.utils.Sanitizer to
 * org.apache.kafka.common.utils.internals.Sanitizer; Debezium 3.6.1 (built against an older
 * kafka-clients) still calls the old name when it registers its JMX metrics, and its task fails
 * with NoClassDefFoundError. This class restores the old name by delegation. It lives only in the
 * Debezium plugin folder, where Connect's plugin class loader finds it after the worker's
 * class path does not.
 */
package org.apache.kafka.common.utils;

public final class Sanitizer {
    private Sanitizer() {
    }

    public static String sanitize(String name) {
        return org.apache.kafka.common.utils.internals.Sanitizer.sanitize(name);
    }

    public static String desanitize(String name) {
        return org.apache.kafka.common.utils.internals.Sanitizer.desanitize(name);
    }

    public static String jmxSanitize(String name) {
        return org.apache.kafka.common.utils.internals.Sanitizer.jmxSanitize(name);
    }
}
