"""`python -m learn_to_ask COMMAND`: see policy.py."""
from learn_to_ask.policy import main

main()
