"""filters/network"""
