fn main() {
    warden::init();
}
