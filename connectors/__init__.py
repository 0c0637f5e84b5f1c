"""Templates of the Kafka, Kafka Connect and Debezium configuration the launcher renders."""
