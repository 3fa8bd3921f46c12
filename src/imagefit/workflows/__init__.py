"""The commands as workflows: a fit as named steps, cross-validation, the LR finder and the
batch preview; each assembles the floors below it."""
