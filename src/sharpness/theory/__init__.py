"""Closed-form theory of sharpness-aware methods, checked against simulation."""
