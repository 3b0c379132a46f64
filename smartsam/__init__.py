"""SmartSAM: one click, the mask the annotator meant.

An annotator-like agent around SAM / SAM 2.1: explore (Priori Initial Sampler, Next Chain
Clickers), then exploit (select by reference similarity or, without one, by IoU score).
Nothing in this package imports Label Studio.
"""

__version__ = "0.1.0"
