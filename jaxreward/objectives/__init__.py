"""Pure objectives: losses, advantages, KL estimators and reward transforms.

Everything here is a function of arrays and static hyper-parameters; nothing
depends on Flax or on a model. See README.md in this folder for the registry
of names.
"""
from jaxreward.objectives import masking, registry, reward
from jaxreward.objectives.masking import masked_mean, masked_sum, masked_whiten
from jaxreward.objectives.reward import bradley_terry_loss
