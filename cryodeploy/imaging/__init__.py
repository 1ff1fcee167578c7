"""Images as numbers: normalization, noise models, synthetic micrographs, metrics, and the image
contract (:mod:`.contract`) that every caller of a model goes through."""
