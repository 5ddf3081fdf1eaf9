"""CoAP (RFC 7252) codecs: the message format and the message layer, sans-IO."""
