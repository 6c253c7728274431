"""Tests of detr_lightning.data."""
