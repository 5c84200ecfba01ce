"""Pure tensor math for the PEFT methods: no module state, no adapter names."""
