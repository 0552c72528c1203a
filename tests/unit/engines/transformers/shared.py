"""What the in-process tests of the transformers engine and its batch share."""

GREEDY_12 = dict(max_new_tokens=12, do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
