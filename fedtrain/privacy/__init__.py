"""Differential privacy for federated training.

Mechanisms (clipping and Gaussian noise on tensors) are kept apart from
accountants: a mechanism reports what it did as a :class:`GaussianEvent`, plain
numbers, and an :class:`Accountant` only ever sees those events. Importing this
package does not import Opacus; the accountants load it on first use.
"""

from fedtrain.privacy.accountant import Accountant, calibrate_noise, epsilon_for
from fedtrain.privacy.events import GaussianEvent

__all__ = ["Accountant", "GaussianEvent", "calibrate_noise", "epsilon_for"]
