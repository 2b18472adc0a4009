"""synthmed generator zoo: contract, model cards, registry, architectures, training."""
