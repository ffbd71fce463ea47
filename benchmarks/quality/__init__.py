"""Merging quality on real pretrained weights and real data (EfficientNet-Lite0, 4 vision tasks).

Fetch: scripts/fetch_quality_data.py. Run: python -m benchmarks.quality.run --size ci|full.
"""
