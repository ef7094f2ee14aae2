"""Quality as numbers: the judge, Inception, the scores (FID, KID, precision/recall), G's spread over z,
and the evaluator that puts them together."""
