"""Unit tests for microenvoy.router."""
