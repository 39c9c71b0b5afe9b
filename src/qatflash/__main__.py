from qatflash.cli import main

main()
