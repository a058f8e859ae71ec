"""Test and benchmark harness: Flower federations on loopback. Not part of the app."""
