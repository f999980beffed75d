"""The in-process PyTorch inference engine behind the local neuron."""
