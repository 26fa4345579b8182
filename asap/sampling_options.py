"""The sampling options of a request (temperature, top_logprobs) and their one validation.

They are checked where a request enters the system: the client SDK, the scheduler's request validation
and the attention rank's prompt intake (an RPC boundary of its own); ``first_token`` checks them again
because it is a public function of the model package. All four call ``check_sampling``. Torch-free, so
the SDK can use it.
"""

from __future__ import annotations

import math

from asap.errors import InvalidArgument

MAX_TOP_LOGPROBS = 20
"""The most alternatives a request may ask for (the OpenAI API's limit)."""


def check_sampling(temperature: float, top_logprobs: int) -> None:
    """Raise ``InvalidArgument`` for a negative or non-finite temperature, or ``top_logprobs`` outside
    [0, ``MAX_TOP_LOGPROBS``]."""
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise InvalidArgument(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
