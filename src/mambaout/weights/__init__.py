"""Weights on disk: the official, timm and our checkpoint layouts, downloads and their cache, the Hub folder format."""
