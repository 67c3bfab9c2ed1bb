"""hacer shared core: settings, topics, messages, bus, models, node wire codec."""
