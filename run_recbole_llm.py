"""Command line: python run_recbole_llm.py --model=Laser --dataset=amazon-scientific [--config_files=...]"""

from recbole_llm.run.cli import main

if __name__ == "__main__":
    main()
