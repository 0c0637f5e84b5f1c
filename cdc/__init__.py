"""The CDC control plane: local stack launcher, Connect REST client, Debezium event decoder."""
