"""Unit tests for microenvoy.filters."""
