"""Protocol <-> exchange mappings for the non-HTTP fronts (MQTT today, CoAP next); sans-IO."""
