"""Unit tests for microenvoy.filters.http."""
