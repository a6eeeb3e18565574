"""Datasets in nnU-Net's layout: case discovery and checks, planning and preprocessing, the manifest, annotation
rounds, converters.
"""
