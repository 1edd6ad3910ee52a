"""persona_steering: steer a language model into a persona through its activations."""

__version__ = "0.1.0"
