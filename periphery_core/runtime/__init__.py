"""Running models and shards in ONNX Runtime: sessions, feeds and the local chain executor."""
