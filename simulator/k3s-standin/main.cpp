#include "standin.hpp"

int main(int argc, char** argv) { return flotilla::standin::run_cli(argc, argv); }
