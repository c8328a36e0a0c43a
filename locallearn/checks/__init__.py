"""Every check of user input, run once before anything is read or built.

* :mod:`~locallearn.checks.specs`: what one option accepts, and :func:`check_config`, which applies a table;
* :mod:`~locallearn.checks.tables`: the table of every option in ``conf/`` (RUN, PROBING, LR_RANGE);
* :mod:`~locallearn.checks.run`: :func:`~locallearn.checks.run.check_run`, the run config's values, then the
  checks that need several of them at once (chunks against the model's depth, block sizes, the mode's limits).

Constructors do not check again: a config that passed here builds.
"""

from locallearn.checks.specs import Choice, Devices, Existing, Flag, Free, Number, Numbers, Spec, check_config
from locallearn.checks.tables import LR_RANGE, PROBING, RUN

__all__ = ["Choice", "Devices", "Existing", "Flag", "Free", "Number", "Numbers", "Spec", "check_config", "LR_RANGE",
           "PROBING", "RUN"]
