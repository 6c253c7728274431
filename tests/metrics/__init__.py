"""Tests of the COCO metrics and the evaluator callback."""
