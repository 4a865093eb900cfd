from localsample.cli import main

main()
