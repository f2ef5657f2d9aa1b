"""`navil.tools`: the `navil` command (`cli`), the converter of original checkpoints (`convert`) and the loaders that
apply the trust rules to a folder's code (`loading`). None of them is a Hub file."""
