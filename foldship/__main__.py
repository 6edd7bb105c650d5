from .cli import main

if __name__ == "__main__":  # sweep workers are spawned processes that import this module again
    main()
