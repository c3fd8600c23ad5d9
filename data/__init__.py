"""The embedded default data set (`data.embedded.generate`) and its word pools (`data.names`)."""
