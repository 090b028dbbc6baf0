"""The tiny model real vLLM serves in tests and the simulator imitates (build.py)."""

from pathlib import Path

TINY_MODEL_DIR = Path(__file__).resolve().parent
