"""filters/http"""
