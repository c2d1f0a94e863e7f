"""Events, codecs and the Kafka / Redis / WebSocket adapters. Never imports torch."""
