"""Measurement: ``legion eval`` (multiple choice and free text), agents as views of an item,
fitting a profile (``legion calibrate``) and in-process agents. The top of ``legion/``: it may
import any other part, and nothing in ``legion/`` imports it.
"""
