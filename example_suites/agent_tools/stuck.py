"""A tool command that never answers (the example suite's tool-timeout demonstration)."""

import time

time.sleep(3600)
