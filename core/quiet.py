"""Third-party chatter kept off the user's terminal unless ``--verbose``.

transformers ("requires torchvision" fallbacks), huggingface_hub ("Couldn't connect to the Hub")
and diffusers ("Loading pipeline components" bars) write to stderr on their own, before or instead
of the one line the CLI promises. :func:`quiet_libraries` silences them through their own switches:
the verbosity and progress-bar environment variables each library reads when it loads (so they
reach Ray's worker processes too), the same settings through each library's logging API when it
is already loaded, and warnings filters for the python warnings they raise. tqdm's own
``TQDM_DISABLE`` default turns off the bars libraries draw without a switch of their own;
arcflow's bars choose for themselves (shown on a terminal only).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: Environment defaults the libraries read at import: their verbosity and progress bars.
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}
#: Packages whose python warnings (FutureWarning, UserWarning, ...) say nothing about the user's job.
QUIET_PACKAGES = ("diffusers", "transformers", "huggingface_hub", "peft", "accelerate")
#: Loggers whose warnings are noise on a user's terminal: Ray's token-auth notice on every local cluster.
QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup", *QUIET_PACKAGES)


def quiet_libraries() -> None:
    """Silence the libraries' own logging, warnings and progress bars (see the module docstring)."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=rf"({'|'.join(QUIET_PACKAGES)})(\.|$)")
    _quiet_loaded()


def _quiet_loaded() -> None:
    """The same settings through the API of each library this process has already imported."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, logging as hub_logging

        hub_logging.set_verbosity_error()
        disable_progress_bars()
