"""The model: what a dual encoder is and where one comes from.

Owns the dual encoder (`dual_encoder`: open_clip's towers, temperature, projector heads, the split of a locked tower
into its frozen prefix and the rest, `towers`), building one from a config (`build`: weights, LiT locking,
tokenizer, open_clip's preprocessing; vclr's model configs in `configs/`), the model sources a command can name
(`source`: a vclr run, an open_clip config with weights, an `hf-hub:` id) and weight converters (`convert`).

May import: vclr.config, vclr.errors, vclr.storage, vclr.rundir. Never the data, training, index or serving code.
"""
