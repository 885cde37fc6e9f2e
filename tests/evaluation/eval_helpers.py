"""Settings shared by the evaluation tests."""

# Fast settings for asking the tiny model: few small frames.
FAST_FRAMES = {"fps": 1.0, "max_frames": 8, "budget_tokens": 4096}
FAST_FLAGS = ["--fps", "1", "--max-frames", "8", "--budget", "4096", "--device", "cpu"]
