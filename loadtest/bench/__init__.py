"""The capacity benchmark: fan-out throughput, latency and memory of each
configuration against a raw baseline (`make bench`, `make bench-smoke`)."""
