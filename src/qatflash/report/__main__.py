from qatflash.cli import report_main

report_main()
