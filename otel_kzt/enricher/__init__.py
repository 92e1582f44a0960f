"""enricher"""
